// Deployed into the existing Azure ML workspace's resource group: the app's roles on the workspace and the
// workspace's Event Grid system topic (job events for the job_events function).
@description('Name of the existing Azure ML workspace.')
param workspaceName string

@description('Name of the workspace\'s Event Grid system topic (one per workspace).')
param systemTopicName string

@description('Tags of the system topic.')
param tags object = {}

@description('Principal id of the app\'s user-assigned identity.')
param appPrincipalId string

@description('Principal id of the deploying user; empty = none.')
param userPrincipalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
])
@description('Kind of principal that userPrincipalId is.')
param userPrincipalType string = 'User'

// AzureML Data Scientist: every workspace action (submit jobs, register models, create and delete online
// endpoints and deployments, list endpoint keys) except creating or deleting compute and changing the workspace.
var dataScientistRoleId = 'f6c7c914-8db3-469d-8ca1-694a8f32e121'
// Monitoring Reader: the janitor reads RequestsPerMinute of the workspace's online endpoints (child resources).
var monitoringReaderRoleId = '43d0d8ad-25c7-4714-9337-8ba259a9fe05'

resource workspace 'Microsoft.MachineLearningServices/workspaces@2024-04-01' existing = {
  name: workspaceName
}

resource appDataScientist 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workspace.id, appPrincipalId, dataScientistRoleId)
  scope: workspace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', dataScientistRoleId)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource appMonitoringReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workspace.id, appPrincipalId, monitoringReaderRoleId)
  scope: workspace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringReaderRoleId)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource userDataScientist 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(workspace.id, userPrincipalId, dataScientistRoleId)
  scope: workspace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', dataScientistRoleId)
    principalId: userPrincipalId
    principalType: userPrincipalType
  }
}

module jobEventsTopic 'system-topic.bicep' = {
  name: '${deployment().name}-topic'
  params: {
    name: systemTopicName
    location: workspace.location
    tags: tags
    sourceResourceId: workspace.id
    topicType: 'Microsoft.MachineLearningServices.Workspaces'
  }
}

output systemTopicName string = jobEventsTopic.outputs.name
output systemTopicPrincipalId string = jobEventsTopic.outputs.principalId
