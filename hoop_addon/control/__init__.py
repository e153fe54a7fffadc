"""The control plane beside the proxy: the HTTP API (`server`: approvals, `/metrics`,
`/healthz`) and the Prometheus metrics it serves (`metrics`)."""
