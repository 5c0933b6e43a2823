"""Chat models at inference: the KV-cache engine (engine.py), conversation rendering
(conversation.py), the calculator tool (calculator.py) and the sandbox for model-written code
(execution.py)."""
