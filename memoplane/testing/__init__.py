"""Test support: a local control plane built from real components (etcd, kube-apiserver, MinIO)."""
