-- Prefect's server needs the pg_trgm extension (PostgreSQL >= 14.9). Its migrations create it too, but only a
-- superuser may: creating it here keeps the server's role free to be an ordinary owner.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
