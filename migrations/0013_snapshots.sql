-- Snapshots: a running VM's memory, device state and disk saved at one instant. The files
-- live in `dir`; `ready` is 0 until they are complete (a crash before that leaves a record
-- reconcile removes with its files). `grp` numbers the snapshot's own group, which alone
-- may read its files.
CREATE TABLE snapshots (
    id              TEXT PRIMARY KEY NOT NULL,
    name            TEXT NOT NULL UNIQUE,
    source_vm_id    TEXT NOT NULL,
    source_vm_name  TEXT NOT NULL,
    image_id        TEXT NOT NULL REFERENCES images (id) ON DELETE RESTRICT,
    vcpus           INTEGER NOT NULL,
    memory_mib      INTEGER NOT NULL,
    disk_size_bytes INTEGER NOT NULL,
    egress          TEXT NOT NULL,
    root_disk       TEXT NOT NULL,
    networked       INTEGER NOT NULL,
    labels          TEXT NOT NULL,
    dir             TEXT NOT NULL,
    grp             INTEGER NOT NULL UNIQUE,
    ready           INTEGER NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    last_operation  TEXT NOT NULL,
    -- The snapshot the source's disk overlaid when this one was taken: this one's frozen
    -- disk overlays that one's, so it stays while this one does.
    base_id         TEXT REFERENCES snapshots (id) ON DELETE RESTRICT
);

-- The snapshot a pool's members are restored from, if any.
ALTER TABLE pools ADD COLUMN snapshot_id TEXT REFERENCES snapshots (id) ON DELETE RESTRICT;

-- The snapshot a VM's disk overlays (restored from it, or the VM it was taken from).
ALTER TABLE vms ADD COLUMN snapshot_id TEXT REFERENCES snapshots (id) ON DELETE RESTRICT;
