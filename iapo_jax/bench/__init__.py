"""Benchmarks: `iapo bench decode` measures decoding throughput against transformers' generate."""
