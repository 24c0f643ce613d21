-- Where a VM's traffic may go beyond its bridge, as JSON ({"mode":"internet"},
-- {"mode":"none"} or {"mode":"allow","cidrs":["10.0.0.0/8"]}).
ALTER TABLE vms ADD COLUMN egress TEXT NOT NULL DEFAULT '{"mode":"internet"}';
