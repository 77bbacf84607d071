# frozen_string_literal: true

# Run by tests/test_ruby_client.py against a real redis-server (and, for
# client_test.rb, a real pool of slot processes):
#   APIPOOL_REDIS_URL  the test's Redis, as a user that may do anything
#   APIPOOL_CLIENT_URL the URL Apipool::Client uses (default APIPOOL_REDIS_URL);
#                      client_test.rb gets the producer user of docs/operations.md
#   APIPOOL_POOL       a pool whose slots run the handlers echo (the default),
#                      fail (a permanent failure) and sleep (client_test.rb only)
require "minitest/autorun"
require "json"
require "securerandom"
require "redis"
require "apipool"

module PoolHelpers
  def redis_url
    ENV.fetch("APIPOOL_REDIS_URL")
  end

  def client_url
    ENV.fetch("APIPOOL_CLIENT_URL", redis_url)
  end

  def raw
    @raw ||= Redis.new(url: redis_url, timeout: 5)
  end

  def key(pool, name)
    "apipool:{#{pool}}:#{name}"
  end

  # A pool no slot serves: what is queued stays queued.
  def idle_pool
    @idle_pool ||= "rb-idle-#{SecureRandom.hex(5)}"
  end

  def monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  def teardown
    @client&.close
    @raw&.close
    super
  end
end
