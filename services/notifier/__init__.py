"""The notifier service: tells merchants, buyers and ops what happened, over SMTP and SMS.

Building blocks (no database or broker here; the actor in actors.py wires them):
- channels/: the `Channel` port and its adapters (SMTP, Aliyun SMS, Tencent SMS, log, fake)
- delivery.py: quiet hours, per-recipient rate limits and retry policy -> `decide_and_send`
- channels/factory.py: `build_channels`, settings (`Settings.smtp`, `Settings.sms`) in,
  channels out; main.py builds the rest of the sender from the other groups
"""
