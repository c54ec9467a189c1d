"""Adapters: each wraps one external system and translates its errors into ``homeiot`` errors."""
