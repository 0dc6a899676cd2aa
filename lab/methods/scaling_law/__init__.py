"""Scaling laws: fitting the Kaplan-form laws to a ladder of small models and predicting larger ones."""
