"""Masking: detectors (`detectors`), the engine over values and JSON documents
(`engine`), bodies by media type (`body`), SSE streams (`sse`), the tokenize vault
(`vault`), bounded decoding of content-encoded bodies (`codec`) and scrubbing of known
secrets (`literal`)."""
