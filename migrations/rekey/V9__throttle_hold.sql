-- gh-ost's operator throttle, for rekey: `rekey throttle RUN on|off` holds a run's
-- publication without pausing it (batches in flight finish; nothing new is published), and
-- the driver says what holds it right now, for `rekey status`.
--
-- rekey.runs.throttle_hold: NULL, or who held the run, when, and why (free text).
-- rekey.drivers.throttle: NULL (nothing holds the driver), or what does: the operator's
-- hold, a flag file, or the latency throttle with its figures.
ALTER TABLE rekey.runs ADD COLUMN throttle_hold text;
ALTER TABLE rekey.drivers ADD COLUMN throttle text;
