from django.urls import include, path

from testproject.shop import views

urlpatterns = [
    path("", views.index, name="index"),
    path("", include("testproject.shop.urls")),
    path("", include("django_prometheus.urls")),
]
