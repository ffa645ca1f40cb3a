"""The documents agent and fleet exchange over MQTT, and the topics they travel on.

:mod:`agent.messages.topics` names the topics (``edgeship/v1/<fleet>/<device>/<leaf>``)
and the compact JSON every payload uses; :mod:`agent.messages.desired` is the ``desired``
message, written by the fleet side and read by the agent. One module per document, so
writer and reader can never disagree (docs/mqtt.md).
"""
