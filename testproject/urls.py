from django.urls import include, path
from health_check.views import HealthCheckView

from django_asyncpool.health import pool_checks
from testproject.shop import views

urlpatterns = [
    path("", views.index, name="index"),
    path("", include("testproject.shop.urls")),
    path("health/", HealthCheckView.as_view(checks=pool_checks()), name="health"),
    path("", include("django_prometheus.urls")),
]
