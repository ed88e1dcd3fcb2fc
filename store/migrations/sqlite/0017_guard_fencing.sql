-- How each guard says it fences itself (issue "Recovery when the BMC is gone": watchdog
-- fencing): its self-fence settings, the timeout of the hardware watchdog it keeps armed (if
-- any) and the cell its quorum rule counts. One row per host, replaced whenever the guard's
-- profile changes (at start, when its peer list changes, and on a clean stop, before it
-- disarms its watchdog). `profile` is JSON (store/src/reports.rs FencingProfile).
CREATE TABLE guard_fencing (
    host TEXT PRIMARY KEY NOT NULL REFERENCES hosts (name),
    at BIGINT NOT NULL,
    profile TEXT NOT NULL
);
