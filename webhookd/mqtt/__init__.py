"""MQTT presence (CONTRACT §11): the broker client, the sources that interpret its messages, settling."""
