module memoplane.local/node/whoami

go 1.22
