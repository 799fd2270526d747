"""agentledger: a flight recorder for AI coding agents. The CLI sits on top of the stages."""

__version__ = "0.1.0"
