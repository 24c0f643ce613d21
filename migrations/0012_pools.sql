-- Warm pools: N VMs of one shape kept booted for creates of that shape to claim. Members
-- are ordinary VM records carrying the label `banger.pool` = the pool's name.
CREATE TABLE pools (
    id              TEXT PRIMARY KEY NOT NULL,
    name            TEXT NOT NULL UNIQUE,
    image_id        TEXT NOT NULL REFERENCES images (id) ON DELETE RESTRICT,
    vcpus           INTEGER NOT NULL,
    memory_mib      INTEGER NOT NULL,
    disk_size_bytes INTEGER NOT NULL,
    egress          TEXT NOT NULL,
    size            INTEGER NOT NULL,
    created_at_ms   INTEGER NOT NULL
);
