# frozen_string_literal: true

require_relative "lib/apipool/version"

Gem::Specification.new do |spec|
  spec.name = "apipool"
  spec.version = Apipool::VERSION
  spec.summary = "Hand calls of a concurrency-limited API to an apipool pool, and wait for the answers"
  spec.description = <<~TEXT
    The Ruby client of apipool: general workers (resque, Sidekiq, a Rails app)
    queue their calls of a paid external API on Redis, where a pool of exactly
    N slot processes makes them without ever passing the API's concurrency
    limit, and read the results back. Speaks apipool's Redis wire format with
    nothing but the redis gem.
  TEXT
  spec.license = "Apache-2.0"
  spec.authors = ["apipool contributors"]
  spec.required_ruby_version = ">= 2.7"
  spec.files = Dir.glob("lib/**/*.rb", base: __dir__) + ["README.md", "apipool.gemspec"]
  spec.require_paths = ["lib"]
  # BLMOVE (redis-rb >= 4.6; Redis >= 6.2); redis-rb 5 reconnects after fork by itself.
  spec.add_runtime_dependency "redis", ">= 4.6", "< 6"
end
