"""For people who already run mitmproxy:

    mitmdump -s addons/mitmdump_addon.py --set residency_config=residency-gate.yaml \
             --set connection_strategy=lazy

(residency-gate must be installed in mitmproxy's Python environment.)
"""

from residency_gate.proxy.mitmdump import MitmdumpResidencyGate

addons = [MitmdumpResidencyGate()]
