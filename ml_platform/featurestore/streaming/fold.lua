-- Fold one batch of records into the entities' event buffers (see buffer.py for the format).
--
-- A buffer is a Redis string: an 8-byte header (the buffer's *epoch*, changed whenever the buffer
-- is rewritten) followed by the records. Appends keep every earlier byte in place, so a worker
-- that cached the first `known` bytes at epoch E only needs the bytes after `known` while the
-- epoch is still E; any rewrite (trim) or re-creation gives a new epoch and a full read.
--
-- ARGV[1]: expiry in ms (0 = none); ARGV[2]: "1" to return the buffers; ARGV[3]: a nonce for new
-- epochs (< 2^36); ARGV[4]: per buffer one fixed-width head (`FOLD_HEAD_DTYPE` in updater.py, 37
-- bytes): key length (u16), record width (u16), trim trigger and trim bound (int64 us), the
-- caller's cached epoch (int64, 0 = none) and cached length (u32), whether to refresh the expiry
-- (u8), the new records' length (u32); ARGV[5]: the keys, concatenated; ARGV[6]: the new records,
-- concatenated. (Three blobs instead of thousands of arguments: packing arguments cost the client
-- more than the script costs Redis; fixed-width heads are built with numpy for the whole batch.)
--
-- Per buffer: APPEND the records (a new buffer gets its header first). The reply says what the
-- caller lacks, never what it sent:
--   "d" + the bytes other workers appended between the caller's cached length and this append
--         (usually none), when the caller's epoch is current;
--   "f" + the whole buffer (header included) otherwise -- as it was *before* any trim, so late
--         events can still look back.
-- If the first record is older than the trigger, the buffer is rewritten without its leading
-- records older than the bound, under a new epoch; the reply's kind is then upper case ("D",
-- "F") and followed by the new epoch and the number of record bytes dropped from the front (two
-- int64, before the data; new epoch 0 = every record was garbage and the buffer is deleted), so
-- the caller trims its copy the same way instead of reading the buffer again.
-- PEXPIRE when asked (a worker refreshes a buffer's expiry at most every EXPIRY_REFRESH_S, not on
-- every append: the expiry is a month, and one call less per buffer is ~20% of the script).
-- Per buffer that is APPEND + one GETRANGE (the header and first record time) in the common case.
local ttl = tonumber(ARGV[1])
local want = ARGV[2] == '1'
local nonce = tonumber(ARGV[3]) * 65536
local heads, names, recs = ARGV[4], ARGV[5], ARGV[6]
local out = {}
local kpos, rpos = 1, 1
for k = 1, #heads / 37 do
  local klen, width, trigger, bound, epoch, known, refresh, nbytes =
    struct.unpack('<HHi8i8i8I4BI4', heads, (k - 1) * 37 + 1)
  local key = string.sub(names, kpos, kpos + klen - 1)
  kpos = kpos + klen
  local records = string.sub(recs, rpos, rpos + nbytes - 1)
  rpos = rpos + nbytes
  local length = redis.call('APPEND', key, records)
  if length == nbytes then
    length = length + 8
    redis.call('SET', key, struct.pack('<i8', nonce + k) .. records)
    refresh = 1
  end
  local head, first = struct.unpack('<i8i8', redis.call('GETRANGE', key, 0, 15))
  local kind, data = '', ''
  if not want then
    kind = ''
  elseif head == epoch and known >= 8 and known <= length - nbytes then
    kind = 'd'
    if known < length - nbytes then data = redis.call('GETRANGE', key, known, length - nbytes - 1) end
  else
    kind = 'f'
    data = redis.call('GET', key)
  end
  if first < trigger then
    -- drop the leading records older than the bound (records arrive nearly in time order; a late
    -- old record further in stays as harmless garbage until it leads)
    local whole = redis.call('GET', key)
    local off = 9
    while off <= #whole and struct.unpack('<i8', whole, off) < bound do off = off + width end
    local new_epoch = 0
    if off <= #whole then
      new_epoch = -(nonce + k)
      redis.call('SET', key, struct.pack('<i8', new_epoch) .. string.sub(whole, off))
      refresh = 1
    else
      redis.call('DEL', key)
      refresh = 0
    end
    if want then kind = string.upper(kind) .. struct.pack('<i8i8', new_epoch, off - 9) end
  end
  out[k] = kind .. data
  if ttl > 0 and refresh == 1 then redis.call('PEXPIRE', key, ttl) end
end
return out
