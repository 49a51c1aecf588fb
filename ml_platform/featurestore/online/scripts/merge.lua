-- Newer-wins merge of field, value pairs (ARGV) into one hash (KEYS[1]). (newer_wins.lua is prepended.)
return newer_wins(KEYS[1], 1)
