"""memoplane's node agent: holds the node's Lease, runs the jobs assigned to the node in
sandboxes and stores their results (DESIGN §6). `python -m memoplane_agent`."""
