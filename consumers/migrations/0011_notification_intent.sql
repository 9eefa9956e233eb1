-- The notifier writes an intent row (outcome 'sending') before its first attempt, then overwrites it with
-- the outcome: a successor of a notifier killed between the receiver's answer and the log write knows the
-- notification may have arrived (so the resolution of a firing that may have arrived is told).
ALTER TABLE notification_log DROP CONSTRAINT IF EXISTS notification_log_outcome_check;
ALTER TABLE notification_log ADD CONSTRAINT notification_log_outcome_check
    CHECK (outcome IN ('sending', 'delivered', 'dead_lettered'));
