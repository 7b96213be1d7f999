"""Nära: video consultations for palliative care at home over poor rural links."""
