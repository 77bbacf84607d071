# frozen_string_literal: true

module Apipool
  # The envelopes this process submitted, newest last, bounded by count and
  # bytes: Client#cancel removes one of them by its exact bytes (LREM), wherever
  # it is in the queue. Forgotten once its result is read or it is cancelled.
  class Sent
    def initialize(max_jobs, max_bytes)
      @max_jobs = max_jobs
      @max_bytes = max_bytes
      @envelopes = {}
      @bytes = 0
      @lock = Mutex.new
      @pid = Process.pid
    end

    def add(id, raw)
      return if raw.bytesize > @max_bytes || @max_jobs <= 0

      locked do
        forget_locked(id)
        @envelopes[id] = raw
        @bytes += raw.bytesize
        forget_locked(@envelopes.first[0]) while @envelopes.size > @max_jobs || @bytes > @max_bytes
      end
    end

    # The envelope of job `id`, or "" when it is not remembered.
    def get(id)
      locked { @envelopes.fetch(id, "") }
    end

    def forget(id)
      locked { forget_locked(id) }
    end

    def size
      locked { @envelopes.size }
    end

    private

    def forget_locked(id)
      raw = @envelopes.delete(id)
      @bytes -= raw.bytesize if raw
    end

    def locked(&block)
      unless @pid == Process.pid # a forked child: the parent's lock may be held
        @pid = Process.pid
        @lock = Mutex.new
      end
      @lock.synchronize(&block)
    end
  end
end
