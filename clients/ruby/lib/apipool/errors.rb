# frozen_string_literal: true

module Apipool
  # Base class of every error the gem raises on purpose (Python: ApipoolError).
  class ApipoolError < StandardError; end

  # A setting or argument is invalid; the message says which and why
  # (an invalid pool name, a batch over MAX_SUBMIT_BATCH).
  class ConfigError < ApipoolError; end

  # Redis could not be reached or answered with an error. The error of the
  # redis gem is the cause (#cause).
  class RedisUnavailable < ApipoolError; end

  # A job envelope does not follow the wire format (docs/wire-format.md): a
  # payload that is not JSON, nested too deep, over the size limit, an invalid
  # job id. Raised before anything is queued.
  class EnvelopeError < ApipoolError; end

  # The pool's queue is at its max_queue_length; nothing was queued.
  class QueueFull < ApipoolError
    attr_reader :pool, :depth, :limit

    def initialize(pool, depth, limit)
      @pool = pool
      @depth = depth
      @limit = limit
      super("queue of pool #{pool.inspect} is full (#{depth} queued, limit #{limit})")
    end
  end

  # No result arrived within the time the caller was willing to wait. The job
  # may still run: cancel it, or give it a deadline.
  class ResultTimeout < ApipoolError
    attr_reader :job_id, :timeout

    def initialize(job_id, timeout)
      @job_id = job_id
      @timeout = timeout
      super(format("no result for job %s within %g s", job_id, timeout))
    end
  end

  # The job was dead-lettered; #reason is the dead-letter reason.
  class JobFailed < ApipoolError
    attr_reader :job_id, :reason, :attempt

    def initialize(job_id, reason, attempt = nil)
      @job_id = job_id
      @reason = reason
      @attempt = attempt
      super("job #{job_id} failed: #{reason}")
    end
  end

  # The job's deadline passed before a slot could call the API for it.
  class JobExpired < JobFailed; end
end
