# frozen_string_literal: true

# apipool for Ruby producers: hand calls of a paid external API to an apipool
# pool (a fleet of slot processes that never holds more connections than the
# API allows) and wait for the answers. See README.md.
require_relative "apipool/version"
require_relative "apipool/errors"
require_relative "apipool/scripts"
require_relative "apipool/envelope"
require_relative "apipool/result"
require_relative "apipool/connections"
require_relative "apipool/sent"
require_relative "apipool/client"
