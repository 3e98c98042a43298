"""memoplane on Kubernetes: the operator-agent protocol and the pure decisions
both sides make. Handlers (operator/) and the agent loop (sandbox-node/) are thin
adapters over this package."""
