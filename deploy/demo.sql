-- Demo tables and rows for `make run` (the development database only): the tables the example
-- catalogue in deploy/stoker.toml works on, so that a new user sees real work within a minute.
-- Safe to run again: tables are created if missing and rows added only once.

CREATE TABLE IF NOT EXISTS users (
    id serial PRIMARY KEY, email text NOT NULL UNIQUE, name text NOT NULL,
    email_verified_at timestamptz, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS products (
    id serial PRIMARY KEY, title text NOT NULL, price numeric(10, 2) NOT NULL,
    on_sale boolean NOT NULL DEFAULT false, stock integer NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS wishlist_items (
    user_id integer NOT NULL REFERENCES users, product_id integer NOT NULL REFERENCES products,
    PRIMARY KEY (user_id, product_id));
CREATE TABLE IF NOT EXISTS wishlist_sale_notices (
    user_id integer NOT NULL, product_id integer NOT NULL, day date NOT NULL,
    PRIMARY KEY (user_id, product_id, day));
CREATE TABLE IF NOT EXISTS inventory_locks (
    id serial PRIMARY KEY, product_id integer NOT NULL, expires_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS password_reset_tokens (
    id serial PRIMARY KEY, user_id integer NOT NULL, expires_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS notifications (
    id serial PRIMARY KEY, user_id integer NOT NULL, read_at timestamptz);
CREATE TABLE IF NOT EXISTS invitations (
    id serial PRIMARY KEY, email text NOT NULL, accepted_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS audit_logs (
    id serial PRIMARY KEY, actor_email text, actor_ip text, anonymised_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS voucher_audit_logs (
    id serial PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now());

INSERT INTO users (email, name, email_verified_at)
SELECT 'user' || i || '@example.com', 'User ' || i, now() FROM generate_series(1, 20) AS i
WHERE NOT EXISTS (SELECT 1 FROM users);

INSERT INTO products (title, price, on_sale, stock)
SELECT 'Product ' || i, 10 + i, i % 3 = 0, 5 * i FROM generate_series(1, 12) AS i
WHERE NOT EXISTS (SELECT 1 FROM products);

INSERT INTO wishlist_items (user_id, product_id)
SELECT u, p FROM generate_series(1, 20) AS u, generate_series(1, 12) AS p
WHERE (u + p) % 5 = 0 AND NOT EXISTS (SELECT 1 FROM wishlist_items);

-- 2,500 expired locks (and 100 live ones) for sql.batch to clear in batches of 1,000.
INSERT INTO inventory_locks (product_id, expires_at)
SELECT 1 + i % 12, now() + CASE WHEN i <= 2500 THEN interval '-1 hour' ELSE interval '1 hour' END
  FROM generate_series(1, 2600) AS i
WHERE NOT EXISTS (SELECT 1 FROM inventory_locks);

-- Work to see at once: clear the expired locks now, and send one welcome email.
SELECT stoker.enqueue('default', 'sql.batch', '{"task": "expired_inventory_locks"}',
                      unique_key => 'demo:locks');
SELECT stoker.enqueue('email-default', 'email.send',
                      '{"to": "user1@example.com", "template": "welcome",
                        "context": {"name": "User 1", "shop_name": "Stoker Demo Shop",
                                    "login_url": "http://localhost/login"}}',
                      unique_key => 'demo:welcome');
