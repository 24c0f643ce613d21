-- Idempotent mutations: a client's request_id, the request it named (its method and
-- encoded body without the id) and, once it succeeded, the encoded response and the id of
-- the operation that ran it. A retry with the same id and body gets that response back.
CREATE TABLE requests (
    request_id TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    body BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'done')),
    response BLOB,
    op_id TEXT,
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX requests_created ON requests(created_at_ms);
