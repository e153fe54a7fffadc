"""Identity: bearer tokens verified into an `Identity`, against the issuers' JWKS
(`verifier`)."""
