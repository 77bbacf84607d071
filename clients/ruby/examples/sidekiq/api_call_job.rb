# frozen_string_literal: true

# A Sidekiq job that hands its call of a concurrency-limited API to an apipool
# pool and waits for the answer, so that however many Sidekiq processes and
# threads run it, the API never sees more than the pool's N connections.
#
#   APIPOOL_REDIS_URL=redis://redis:6379/0 APIPOOL_POOL=payments \
#     sidekiq -r ./api_call_job.rb -q api -c 10
#
#   ApiCallJob.perform_async({ "method" => "GET", "url" => "https://api.example.com/v1/x" })
#
# The pool's Redis (APIPOOL_REDIS_URL) may be Sidekiq's own Redis or another
# one. tests/test_sidekiq.py runs this file in a real Sidekiq process.
require "json"
require "sidekiq"
require "apipool"

class ApiCallJob
  include Sidekiq::Job # Sidekiq::Worker before Sidekiq 6.3

  # A failed call is retried by the pool (up to its max_attempts) before the
  # job sees JobFailed; Sidekiq's own retry then submits the call again.
  sidekiq_options queue: "api", retry: 3

  # Seconds a job waits for its answer (APIPOOL_WAIT_SECONDS, default 60).
  # Also the call's deadline: a call still queued when the job stops waiting
  # is answered expired by the pool instead of being made (and paid for).
  WAIT_SECONDS = Float(ENV.fetch("APIPOOL_WAIT_SECONDS", "60"))

  @client_lock = Mutex.new

  # One client per Sidekiq process, shared by its threads: it gives each
  # thread that is waiting its own Redis connection, and survives fork.
  def self.apipool
    @client_lock.synchronize do
      @apipool ||= Apipool::Client.new(redis: ENV.fetch("APIPOOL_REDIS_URL"),
                                       pool: ENV.fetch("APIPOOL_POOL"))
    end
  end

  # request: the pool handler's payload; for the built-in http handler
  #   {"method" => "POST", "url" => ..., "headers" => {...}, "body" => ...}.
  # reply_to: optionally, a list in Sidekiq's Redis where the answer is pushed
  #   as JSON (for whoever waits on it); the answer is also the return value.
  # Raises Apipool::JobFailed, JobExpired or ResultTimeout for Sidekiq to retry.
  def perform(request, reply_to = nil)
    started = Time.now.to_f
    answer = call_through_pool(request)
    if reply_to
      entry = { "jid" => jid, "request" => request, "answer" => answer, "started_at" => started,
                "finished_at" => Time.now.to_f, "pid" => Process.pid,
                "thread" => Thread.current.object_id }
      Sidekiq.redis { |conn| conn.lpush(reply_to, JSON.generate(entry)) }
    end
    answer
  end

  private

  # Submits the call and waits for its answer. A wait that ends without one
  # (ResultTimeout, or Sidekiq::Shutdown raised into this thread when Sidekiq
  # stops) cancels the call if no slot has taken it yet: a Sidekiq retry
  # submits it again, and nobody pays for the first one.
  def call_through_pool(request)
    client = self.class.apipool
    id = client.submit(request, deadline: Time.now + WAIT_SECONDS, meta: { "sidekiq_jid" => jid })
    begin
      client.result(id, WAIT_SECONDS)
    rescue Apipool::JobFailed # answered: dead-lettered or expired, nothing left to cancel
      raise
    rescue Exception # rubocop:disable Lint/RescueException -- Sidekiq::Shutdown is one
      begin
        client.cancel(id)
      rescue Apipool::ApipoolError
        nil # the deadline still bounds it
      end
      raise
    end
  end
end
