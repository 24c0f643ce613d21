-- Durable intent only (DESIGN §3): identity, spec, desired and observed state and
-- the deterministic runtime facts derivable from identity. Transient host
-- handles (PIDs, taps, loop devices) never live here: see <vm_dir>/handles.json.

CREATE TABLE images (
    id                TEXT PRIMARY KEY NOT NULL,
    name              TEXT NOT NULL UNIQUE,
    kernel_path       TEXT NOT NULL,
    initrd_path       TEXT,
    rootfs_path       TEXT NOT NULL,
    kernel_args       TEXT NOT NULL DEFAULT '',
    rootfs_size_bytes INTEGER NOT NULL,
    created_at_ms     INTEGER NOT NULL
) STRICT;

CREATE TABLE vms (
    id              TEXT PRIMARY KEY NOT NULL,
    name            TEXT NOT NULL UNIQUE,
    image_id        TEXT NOT NULL REFERENCES images(id) ON DELETE RESTRICT,
    vcpus           INTEGER NOT NULL CHECK (vcpus > 0),
    memory_mib      INTEGER NOT NULL CHECK (memory_mib > 0),
    desired_state   TEXT NOT NULL,
    observed_state  TEXT NOT NULL,
    vsock_cid       INTEGER NOT NULL UNIQUE CHECK (vsock_cid >= 3),
    vm_dir          TEXT NOT NULL,
    last_error      TEXT NOT NULL DEFAULT '',
    last_operation  TEXT NOT NULL DEFAULT '',
    created_at_ms   INTEGER NOT NULL,
    updated_at_ms   INTEGER NOT NULL,
    generation      INTEGER NOT NULL DEFAULT 1
) STRICT;

CREATE INDEX vms_image_id ON vms(image_id);
