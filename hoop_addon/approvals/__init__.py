"""Approvals: the queue of requests waiting for a human (`queue`) and the notifications
that tell approvers about them (`webhook`)."""
