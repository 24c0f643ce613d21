-- Revisions start at 1, so that 0 is never a revision: a ListVms on a host that has recorded
-- no event yet returns revision 1, and WatchVms from it replays every event after the list,
-- while from_revision 0 keeps meaning "only from now on". The first event is revision 2.
INSERT INTO sqlite_sequence (name, seq)
SELECT 'events', 1 WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'events');
UPDATE sqlite_sequence SET seq = 1 WHERE name = 'events' AND seq < 1;
