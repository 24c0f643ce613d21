-- Where a container image came from and what it runs with, as JSON (source, manifest and
-- config digests, platform, layers, config); NULL for images imported from boot files.
ALTER TABLE images ADD COLUMN origin TEXT;
