"""Tools around the trainer, each a `gist-scale` subcommand: `bench` (throughput against sentence-transformers),
`report` (a run's PNG), `wordnet` (`gist-scale data wordnet`, the sample's builder). The trainer never imports them.
"""
