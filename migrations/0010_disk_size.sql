-- The size a VM's root disk was asked to have, in bytes; 0: its image's size.
ALTER TABLE vms ADD COLUMN disk_size_bytes INTEGER NOT NULL DEFAULT 0;
