# frozen_string_literal: true

module Apipool
  # The Lua scripts of the wire format, byte for byte the text of
  # operator/apipool/layout.py (tests/test_ruby_client.py compares them), so
  # both clients share one SHA-1 in the server's script cache. Change them
  # there first, then here.
  module Scripts
    # KEYS[1] queue, KEYS[2] config, KEYS[3] stats
    # ARGV    envelopes (JSON), pushed in order
    # returns the queue length after the push, or -1 - current length when the
    #         batch would pass max_queue_length (nothing pushed)
    SUBMIT = <<~'LUA'

      local limit = tonumber(redis.call('HGET', KEYS[2], 'max_queue_length') or '0') or 0
      local depth = redis.call('LLEN', KEYS[1])
      if limit > 0 and depth + #ARGV > limit then
        return -1 - depth
      end
      local n = depth
      for i = 1, #ARGV, 1000 do
        n = redis.call('LPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
      end
      redis.call('HINCRBY', KEYS[3], 'submitted', #ARGV)
      return n
    LUA

    # KEYS[1] queue, KEYS[2] stats
    # ARGV[1] job id, ARGV[2] the envelope exactly as submitted, or '' (not known),
    # ARGV[3] the most envelopes to scan by id when the exact one is not in the queue
    # returns 1 when the job was removed from the queue (counted cancelled),
    #         0 when it is not in the queue, -1 when it is not among the ARGV[3]
    #         envelopes nearest the end slots take from (the queue is longer)
    CANCEL = <<~'LUA'

      if ARGV[2] ~= '' and redis.call('LREM', KEYS[1], 1, ARGV[2]) > 0 then
        redis.call('HINCRBY', KEYS[2], 'cancelled', 1)
        return 1
      end
      local n = redis.call('LLEN', KEYS[1])
      local stop = math.max(0, n - tonumber(ARGV[3]))
      local hi = n - 1
      while hi >= stop do
        local lo = math.max(stop, hi - 99)
        local chunk = redis.call('LRANGE', KEYS[1], lo, hi)
        for i = #chunk, 1, -1 do
          local v = chunk[i]
          if string.find(v, ARGV[1], 1, true) then
            local ok, doc = pcall(cjson.decode, v)
            if ok and type(doc) == 'table' and doc['id'] == ARGV[1] then
              redis.call('LREM', KEYS[1], -1, v)
              redis.call('HINCRBY', KEYS[2], 'cancelled', 1)
              return 1
            end
          end
        end
        hi = lo - 1
      end
      if stop > 0 then
        return -1
      end
      return 0
    LUA
  end

  # The default bound of CANCEL's scan by id (layout.py CANCEL_SCAN).
  CANCEL_SCAN = 1000
end
