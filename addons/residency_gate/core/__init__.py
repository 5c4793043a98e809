"""The pure core: places, requests, requirements, locators, decisions, reroutes, wording.

Nothing here imports mitmproxy or does I/O (a test enforces it): the proxy, `explain`,
`audit replay`, tests and benches all decide through the same functions.
"""
