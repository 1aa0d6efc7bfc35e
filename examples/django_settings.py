"""What a Django project adds to its settings.py (Django 4.2+, the psycopg 3 backend).

`pip install 'cdc-audit[django]'`. Every request's transactions then carry the authenticated
user (its primary key) as actor_id, the X-Request-ID header (or a generated id) as trace_id
and the client address; statements outside requests carry whatever `acting_as(...)` says.
"""

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "cdc_audit.integrations.django.AuditContextMiddleware",  # after authentication
    "django.contrib.messages.middleware.MessageMiddleware",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "app",
        "USER": "app",  # a role granted cdc_audit_app
        "HOST": "127.0.0.1",
        "PORT": "5432",  # or PgBouncer's port: transaction pooling is fine
        "ATOMIC_REQUESTS": True,  # or False: both are handled
        # Behind PgBouncer in transaction mode, keep server-side prepared statements off
        # (the default for Django's psycopg 3 backend): no "server_side_binding": True.
    }
}

CDC_AUDIT = {
    "SCHEMA": "cdc_audit",
    "ACTOR_ATTRIBUTE": "pk",  # or "username"
    "REQUEST_ID_HEADER": "X-Request-ID",
}

# In a management command or a task, outside any request:
#
#     from cdc_audit.integrations import acting_as
#     from cdc_audit.integrations.django import install
#
#     install()
#     with acting_as(actor_id="cron:cleanup", reason="retention"):
#         Account.objects.filter(closed=True).update(note="archived")
#
# and app events:
#
#     from django.db import connection
#     import cdc_audit
#     cdc_audit.log_event(connection.connection, "admin.user.role_granted", f"user:{u.pk}")
