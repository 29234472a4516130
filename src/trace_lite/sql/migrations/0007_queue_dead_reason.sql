-- Poison wake-ups: a receiver can move a message it cannot use to the dead-letter queue at once
-- (Queue.dead_letter), and the reason stays with the dead letter until it is redriven or deleted.
-- NULL for messages dead-lettered after max_receives.
ALTER TABLE queue_messages ADD COLUMN IF NOT EXISTS dead_reason text;
