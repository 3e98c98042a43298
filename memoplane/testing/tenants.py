"""Object-store users that write only under their own prefix: how two memoplane installs share
one bucket (DESIGN §11). Each install reads the whole bucket (whose results it serves is its
ResultCaches' trust policy's decision, not the store's) and writes only below its prefix, so
neither can replace the other's refs or results. Made with MinIO's admin API, as the local
control plane's root user; on a real MinIO, `mc admin policy create` with prefix_policy's JSON.
"""

from __future__ import annotations

import secrets
from typing import Any

from memoplane.testing.cluster import ClusterInfo


def prefix_policy(bucket: str, prefix: str) -> dict[str, Any]:
    """Read `bucket`, write and delete only under `prefix`/."""
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
         "Resource": [f"arn:aws:s3:::{bucket}"]},
        {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [f"arn:aws:s3:::{bucket}/*"]},
        {"Effect": "Allow", "Action": ["s3:PutObject", "s3:DeleteObject"],
         "Resource": [f"arn:aws:s3:::{bucket}/{prefix.strip('/')}/*"]},
    ]}


def scoped_user(info: ClusterInfo, name: str, bucket: str, prefix: str) -> tuple[str, str]:
    """(access key, secret key) of a new user `name` of the control plane's MinIO with
    prefix_policy(bucket, prefix); the bucket is created if missing. Running it again gives the
    user a new secret key."""
    from minio import Minio, MinioAdmin
    from minio.credentials.providers import StaticProvider
    from minio.error import MinioAdminException

    from memoplane.cas.s3 import parse_endpoint

    host, secure = parse_endpoint(info.s3_endpoint)
    root = Minio(host, access_key=info.s3_access_key, secret_key=info.s3_secret_key, secure=secure)
    if not root.bucket_exists(bucket):
        root.make_bucket(bucket)
    admin = MinioAdmin(endpoint=host, credentials=StaticProvider(info.s3_access_key, info.s3_secret_key),
                       secure=secure)
    secret = secrets.token_hex(20)
    admin.user_add(name, secret)
    admin.policy_add(name, policy=prefix_policy(bucket, prefix))
    try:
        admin.attach_policy([name], user=name)
    except MinioAdminException as exc:
        if "PolicyChangeAlreadyApplied" not in str(exc):   # a second run: attached already
            raise
    return name, secret
