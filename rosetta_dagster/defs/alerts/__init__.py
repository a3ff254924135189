"""Alerts: the notification sensor."""
