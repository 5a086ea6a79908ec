-- Demo tables and rows for `make run` (the development database only): every table the
-- catalogue in deploy/stoker.toml works on, with rows that make each job do visible work.
-- In production each team has its own tables; here the five seed apps share one database, so
-- `users` and `products` carry the columns all of them use.
-- Safe to run again: tables and columns are created if missing, rows added only once.

-- Shared by the teams: users (D: karma, avatars; E: unverified accounts) and products (C, E).
CREATE TABLE IF NOT EXISTS users (
    id serial PRIMARY KEY, email text NOT NULL UNIQUE, name text NOT NULL,
    email_verified_at timestamptz, created_at timestamptz NOT NULL DEFAULT now());
ALTER TABLE users ADD COLUMN IF NOT EXISTS karma integer NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN IF NOT EXISTS avatar_file_id integer;
CREATE TABLE IF NOT EXISTS products (
    id serial PRIMARY KEY, title text NOT NULL, price numeric(10, 2) NOT NULL,
    on_sale boolean NOT NULL DEFAULT false, stock integer NOT NULL DEFAULT 0);
ALTER TABLE products ADD COLUMN IF NOT EXISTS restocked_at timestamptz;

-- A. NestJS shop: vouchers and their audit log.
CREATE TABLE IF NOT EXISTS vouchers (
    id serial PRIMARY KEY, code text NOT NULL UNIQUE, expires_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS voucher_audit_logs (
    id serial PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now());
ALTER TABLE voucher_audit_logs ADD COLUMN IF NOT EXISTS voucher_id integer;
ALTER TABLE voucher_audit_logs ADD COLUMN IF NOT EXISTS action text NOT NULL DEFAULT 'CREATED';

-- B. Multi-tenant SaaS: uploads that expire (files under .stoker/demo/saas-uploads).
CREATE TABLE IF NOT EXISTS uploads (
    id serial PRIMARY KEY, org_id text NOT NULL, storage_path text NOT NULL,
    expires_at timestamptz NOT NULL);

-- C. Sim-racing shop: wishlists, and the notices already sent (one per day, one per restock).
CREATE TABLE IF NOT EXISTS wishlist_items (
    user_id integer NOT NULL REFERENCES users, product_id integer NOT NULL REFERENCES products,
    PRIMARY KEY (user_id, product_id));
CREATE TABLE IF NOT EXISTS wishlist_sale_notices (
    user_id integer NOT NULL, product_id integer NOT NULL, day date NOT NULL,
    PRIMARY KEY (user_id, product_id, day));
CREATE TABLE IF NOT EXISTS wishlist_stock_notices (
    user_id integer NOT NULL, product_id integer NOT NULL, restocked_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, product_id, restocked_at));

-- D. Community marketplace: the seven retention jobs' tables.
CREATE TABLE IF NOT EXISTS invitations (
    id serial PRIMARY KEY, email text NOT NULL, accepted_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS push_tokens (
    id serial PRIMARY KEY, user_id integer NOT NULL, token text NOT NULL,
    last_used_at timestamptz, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS audit_logs (
    id serial PRIMARY KEY, anonymised_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now());
ALTER TABLE audit_logs ADD COLUMN IF NOT EXISTS user_id integer;
ALTER TABLE audit_logs ADD COLUMN IF NOT EXISTS ip_address text;
ALTER TABLE audit_logs ADD COLUMN IF NOT EXISTS user_agent text;
ALTER TABLE audit_logs ADD COLUMN IF NOT EXISTS action text NOT NULL DEFAULT 'login';
ALTER TABLE audit_logs ADD COLUMN IF NOT EXISTS metadata jsonb NOT NULL DEFAULT '{}';
CREATE TABLE IF NOT EXISTS uploaded_files (
    id serial PRIMARY KEY, path text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS projects (
    id serial PRIMARY KEY, owner_id integer NOT NULL, title text NOT NULL,
    image_file_id integer);
CREATE TABLE IF NOT EXISTS deletion_requests (
    id serial PRIMARY KEY, user_id integer NOT NULL,
    mode text NOT NULL CHECK (mode IN ('anonymise', 'delete')),
    requested_at timestamptz NOT NULL DEFAULT now(), finalized_at timestamptz);
CREATE TABLE IF NOT EXISTS karma_events (
    id serial PRIMARY KEY, user_id integer NOT NULL, points integer NOT NULL);
CREATE TABLE IF NOT EXISTS karma_changes (
    id serial PRIMARY KEY, user_id integer NOT NULL, old_karma integer NOT NULL,
    new_karma integer NOT NULL, changed_at timestamptz NOT NULL DEFAULT now());

-- E. Jewellery shop.
CREATE TABLE IF NOT EXISTS inventory_locks (
    id serial PRIMARY KEY, product_id integer NOT NULL, expires_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS password_reset_tokens (
    id serial PRIMARY KEY, user_id integer NOT NULL, expires_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS notifications (
    id serial PRIMARY KEY, user_id integer NOT NULL, read_at timestamptz);
CREATE TABLE IF NOT EXISTS payments (
    id serial PRIMARY KEY, order_ref text NOT NULL, amount numeric(10, 2) NOT NULL,
    status text NOT NULL DEFAULT 'PENDING', created_at timestamptz NOT NULL DEFAULT now(),
    checked_at timestamptz);
CREATE TABLE IF NOT EXISTS orders (
    id serial PRIMARY KEY, status text NOT NULL, total numeric(10, 2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now());

-- Rows ----------------------------------------------------------------------------------------

-- 20 verified users, 10 unverified for 60 days (unverified_users_cleanup deletes those).
INSERT INTO users (email, name, email_verified_at, created_at)
SELECT 'user' || i || '@example.com', 'User ' || i,
       CASE WHEN i <= 20 THEN now() END,
       now() - CASE WHEN i <= 20 THEN interval '1 day' ELSE interval '60 days' END
  FROM generate_series(1, 30) AS i
WHERE NOT EXISTS (SELECT 1 FROM users);

-- Products 1-12; 3, 6, 9, 12 on sale; 1 and 2 at or below 5 in stock (low_stock_alert);
-- 4 and 8 just restocked (wishlist_stock_check).
INSERT INTO products (title, price, on_sale, stock, restocked_at)
SELECT 'Product ' || i, 10 + i, i % 3 = 0, 3 * i - 2,
       CASE WHEN i IN (4, 8) THEN now() - interval '5 minutes' END
  FROM generate_series(1, 12) AS i
WHERE NOT EXISTS (SELECT 1 FROM products);

INSERT INTO wishlist_items (user_id, product_id)
SELECT u, p FROM generate_series(1, 20) AS u, generate_series(1, 12) AS p
WHERE (u + p) % 5 = 0 AND NOT EXISTS (SELECT 1 FROM wishlist_items);

-- 30 vouchers, 10 of them expired (voucher_expiry writes an EXPIRED row for each), and 3,000
-- audit rows older than two years (voucher_audit_archival deletes them in batches of 1,000).
INSERT INTO vouchers (code, expires_at)
SELECT 'VOUCHER-' || i, now() + CASE WHEN i <= 10 THEN interval '-3 days' ELSE interval '30 days' END
  FROM generate_series(1, 30) AS i
WHERE NOT EXISTS (SELECT 1 FROM vouchers);
INSERT INTO voucher_audit_logs (voucher_id, action, created_at)
SELECT 1 + i % 30, 'USED', now() - interval '800 days' + make_interval(mins => i)
  FROM generate_series(1, 3000) AS i
WHERE NOT EXISTS (SELECT 1 FROM voucher_audit_logs);

-- 12 uploads, 8 expired (storage_cleanup deletes their files and rows).
INSERT INTO uploads (org_id, storage_path, expires_at)
SELECT 'org_' || (1 + i % 3), 'org_' || (1 + i % 3) || '/upload-' || i || '.bin',
       now() + CASE WHEN i <= 8 THEN interval '-1 hour' ELSE interval '1 day' END
  FROM generate_series(1, 12) AS i
WHERE NOT EXISTS (SELECT 1 FROM uploads);

-- 50 pending invitations 45 days old, 5 fresh; 200 push tokens unused for 120 days, 20 in use.
INSERT INTO invitations (email, created_at)
SELECT 'invitee' || i || '@example.com',
       now() - CASE WHEN i <= 50 THEN interval '45 days' ELSE interval '1 day' END
  FROM generate_series(1, 55) AS i
WHERE NOT EXISTS (SELECT 1 FROM invitations);
INSERT INTO push_tokens (user_id, token, last_used_at, created_at)
SELECT 1 + i % 20, md5(i::text),
       now() - CASE WHEN i <= 200 THEN interval '120 days' ELSE interval '1 day' END,
       now() - interval '200 days'
  FROM generate_series(1, 220) AS i
WHERE NOT EXISTS (SELECT 1 FROM push_tokens);

-- Audit logs: 600 older than a year with personal data in the row and the JSON metadata
-- (anonymised), 100 of them older than three years (deleted), and 50 recent ones (kept).
INSERT INTO audit_logs (user_id, ip_address, user_agent, action, metadata, created_at)
SELECT 1 + i % 20, '203.0.113.' || (i % 250), 'Mozilla/5.0 (demo)', 'profile.update',
       jsonb_build_object('email', 'user' || (1 + i % 20) || '@example.com',
                          'name', 'User ' || (1 + i % 20), 'phone', '+1 555 0100',
                          'address', '1 Demo Street', 'changed', 'bio'),
       now() - CASE WHEN i <= 100 THEN interval '4 years' WHEN i <= 600 THEN interval '400 days'
                    ELSE interval '10 days' END
  FROM generate_series(1, 650) AS i
WHERE NOT EXISTS (SELECT 1 FROM audit_logs);

-- 40 uploaded files 60 days old (files under .stoker/demo/marketplace-uploads): 1-10 are
-- avatars, 11-15 project images, 16-40 orphans (orphaned_files_cleanup deletes them).
INSERT INTO uploaded_files (path, created_at)
SELECT 'file-' || i || '.png', now() - interval '60 days' FROM generate_series(1, 40) AS i
WHERE NOT EXISTS (SELECT 1 FROM uploaded_files);
UPDATE users SET avatar_file_id = id WHERE id <= 10 AND avatar_file_id IS NULL;
INSERT INTO projects (owner_id, title, image_file_id)
SELECT i, 'Project ' || i, 10 + i FROM generate_series(1, 5) AS i
WHERE NOT EXISTS (SELECT 1 FROM projects);

-- Three deletion requests past the 30-day grace (two anonymise, one delete), one within it.
INSERT INTO deletion_requests (user_id, mode, requested_at)
SELECT user_id, mode, now() - make_interval(days => age)
  FROM (VALUES (17, 'anonymise', 40), (18, 'anonymise', 35), (19, 'delete', 31),
               (20, 'delete', 3)) AS r(user_id, mode, age)
WHERE NOT EXISTS (SELECT 1 FROM deletion_requests);

-- Karma events for 20 users: every user's karma is stale (karma_recalculation, batches of 50).
INSERT INTO karma_events (user_id, points)
SELECT 1 + i % 20, 1 + i % 7 FROM generate_series(1, 400) AS i
WHERE NOT EXISTS (SELECT 1 FROM karma_events);

-- 2,500 expired locks (and 100 live ones) for sql.batch to clear in batches of 1,000.
INSERT INTO inventory_locks (product_id, expires_at)
SELECT 1 + i % 12, now() + CASE WHEN i <= 2500 THEN interval '-1 hour' ELSE interval '1 hour' END
  FROM generate_series(1, 2600) AS i
WHERE NOT EXISTS (SELECT 1 FROM inventory_locks);
INSERT INTO password_reset_tokens (user_id, expires_at)
SELECT 1 + i % 20, now() + CASE WHEN i <= 30 THEN interval '-2 hours' ELSE interval '1 hour' END
  FROM generate_series(1, 40) AS i
WHERE NOT EXISTS (SELECT 1 FROM password_reset_tokens);
INSERT INTO notifications (user_id, read_at)
SELECT 1 + i % 20, CASE WHEN i <= 80 THEN now() - interval '45 days' END
  FROM generate_series(1, 100) AS i
WHERE NOT EXISTS (SELECT 1 FROM notifications);

-- 8 payments PENDING for 20 minutes (stale_payments_recheck), 2 just made.
INSERT INTO payments (order_ref, amount, created_at)
SELECT 'ORDER-' || i, 50 + i, now() - CASE WHEN i <= 8 THEN interval '20 minutes' ELSE interval '1 minute' END
  FROM generate_series(1, 10) AS i
WHERE NOT EXISTS (SELECT 1 FROM payments);

-- Today's orders for the daily sales report (cancelled and pending ones are not counted).
INSERT INTO orders (status, total, created_at)
SELECT (ARRAY['processing', 'shipped', 'delivered', 'cancelled', 'pending'])[1 + i % 5],
       round((20 + i * 7.5)::numeric, 2), date_trunc('day', now()) + make_interval(mins => i)
  FROM generate_series(1, 25) AS i
WHERE NOT EXISTS (SELECT 1 FROM orders);

-- Work to see at once: clear the expired locks now, and send one welcome email.
SELECT stoker.enqueue('default', 'sql.batch', '{"task": "expired_inventory_locks"}',
                      unique_key => 'demo:locks');
SELECT stoker.enqueue('email-default', 'email.send',
                      '{"to": "user1@example.com", "template": "welcome",
                        "context": {"name": "User 1", "shop_name": "Stoker Demo Shop",
                                    "login_url": "http://localhost/login"}}',
                      unique_key => 'demo:welcome');

-- B. A user's own schedule, created at run time by the SaaS app (see the README): a weekly
-- report for one organisation, Mondays 08:00 in the user's zone.
INSERT INTO stoker.schedules (name, cron, timezone, kind, queue, payload, meta, description)
VALUES ('org_123.weekly_report.u42', '0 8 * * 1', 'Europe/Berlin', 'log', 'default',
        '{"message": "weekly report for org_123"}',
        '{"org": "org_123", "created_by": "user_42"}',
        'weekly usage report, created by user_42 in org_123')
ON CONFLICT (name) DO NOTHING;
