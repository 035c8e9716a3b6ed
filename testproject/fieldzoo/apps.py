from django.apps import AppConfig


class FieldZooConfig(AppConfig):
    name = "testproject.fieldzoo"
    default_auto_field = "django.db.models.BigAutoField"
