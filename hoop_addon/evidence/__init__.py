"""Evidence: session recordings (`recording`), the hash-chained audit log (`audit_log`),
signing keys and canonical JSON (`keys`), offline verification (`verify`) and evidence
bundles for auditors (`bundle`)."""
