"""Everything that imports mitmproxy: hooks, flow <-> request mapping, refusal responses,
`resolve`, and the `mitmdump -s` entry."""
