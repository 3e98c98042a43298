"""memoplane."""
