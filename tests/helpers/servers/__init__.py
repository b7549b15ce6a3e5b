"""Real server processes for the integration tests (and benchmarks/), each on a free loopback port:
``openai_server`` (canned answers, or ``transformers serve``), ``s3server`` (SeaweedFS ``weed mini``),
``raycluster`` (a multi-node Ray cluster in a child process). Each module is also the server's own script."""
