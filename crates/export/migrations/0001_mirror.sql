-- clearhouse reporting mirror, version 1. Applied by `clearhouse export postgres` (and `serve`
-- with a postgres export) inside the configured schema, in one transaction, under an advisory
-- lock; recorded in clearhouse_migrations. Amounts are minor units (numeric(39,0): a u128 fits);
-- times are nanoseconds since the Unix epoch (bigint) with a timestamptz beside them.
-- Everything here is derived from the voucher chain: the switch remains the truth.

-- Where the mirror ends: the last voucher applied, in the same transaction as its rows.
CREATE TABLE clearhouse_export_state (
    id smallint PRIMARY KEY CHECK (id = 1),
    last_seq bigint NOT NULL,
    last_hash bytea NOT NULL,
    -- The settlement window open after last_seq (payments that follow belong to it).
    open_window bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO clearhouse_export_state (id, last_seq, last_hash, open_window)
VALUES (1, 0, '\x0000000000000000000000000000000000000000000000000000000000000000', 1);

-- Every voucher, as hashed (body: canonical JSON, `body::jsonb` to query it).
CREATE TABLE vouchers (
    seq bigint PRIMARY KEY,
    hash bytea NOT NULL,
    kind text NOT NULL,
    window_no bigint NOT NULL,
    body text NOT NULL
);
CREATE INDEX vouchers_kind_window ON vouchers (kind, window_no);

-- Final payments: settled (money moved) or rejected (with the ISO 20022 reason).
CREATE TABLE payments (
    payment_id text PRIMARY KEY,
    uetr text NOT NULL,
    end_to_end_id text,
    debtor_agent text NOT NULL,
    creditor_agent text NOT NULL,
    currency text NOT NULL,
    amount numeric(39, 0) NOT NULL,
    status text NOT NULL CHECK (status IN ('settled', 'rejected')),
    reason text,
    final_at_ns bigint NOT NULL,
    final_at timestamptz NOT NULL,
    window_no bigint NOT NULL,
    voucher_seq bigint NOT NULL UNIQUE REFERENCES vouchers (seq)
);
CREATE INDEX payments_uetr ON payments (uetr);
CREATE INDEX payments_window ON payments (window_no, status);

-- Returns of settled payments (pacs.004): from the returning agent back to the receiving agent.
CREATE TABLE returns (
    return_key text PRIMARY KEY,
    original_payment text NOT NULL,
    original_uetr text NOT NULL,
    returning_agent text NOT NULL,
    receiving_agent text NOT NULL,
    currency text NOT NULL,
    amount numeric(39, 0) NOT NULL,
    reason text NOT NULL,
    returned_at_ns bigint NOT NULL,
    window_no bigint NOT NULL,
    voucher_seq bigint NOT NULL UNIQUE REFERENCES vouchers (seq)
);

-- Liquidity moved between the settlement bank and a participant's position.
CREATE TABLE liquidity (
    transfer_id text PRIMARY KEY,
    participant text NOT NULL,
    currency text NOT NULL,
    direction text NOT NULL CHECK (direction IN ('in', 'out')),
    amount numeric(39, 0) NOT NULL,
    at_ns bigint NOT NULL,
    window_no bigint NOT NULL,
    voucher_seq bigint NOT NULL UNIQUE REFERENCES vouchers (seq)
);

-- Settlement windows: closed (with the operator's signed checkpoint) and settled.
CREATE TABLE windows (
    window_no bigint PRIMARY KEY,
    opened_at_ns bigint,
    closed_at_ns bigint,
    closed_seq bigint REFERENCES vouchers (seq),
    checkpoint_hash bytea,
    checkpoint_signature bytea,
    settled_at_ns bigint,
    settled_seq bigint REFERENCES vouchers (seq),
    adjustments integer
);

-- Each participant's position per window and currency, from settled payments and returns:
-- net = received - sent.
CREATE TABLE positions (
    window_no bigint NOT NULL,
    participant text NOT NULL,
    currency text NOT NULL,
    sent numeric(39, 0) NOT NULL DEFAULT 0,
    sent_count bigint NOT NULL DEFAULT 0,
    received numeric(39, 0) NOT NULL DEFAULT 0,
    received_count bigint NOT NULL DEFAULT 0,
    net numeric(40, 0) GENERATED ALWAYS AS (received - sent) STORED,
    PRIMARY KEY (window_no, participant, currency)
);

-- The fund adjustments of each window's settlement: net > 0 the participant received it.
CREATE TABLE fund_adjustments (
    window_no bigint NOT NULL,
    participant text NOT NULL,
    currency text NOT NULL,
    net numeric(40, 0) NOT NULL,
    voucher_seq bigint NOT NULL UNIQUE REFERENCES vouchers (seq),
    PRIMARY KEY (window_no, participant, currency)
);
