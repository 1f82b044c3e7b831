"""On-prem AI voice-agent appliance."""
